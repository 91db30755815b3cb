"""The panel's contract: every widget DiffSeg.py uses from Resources/UI/DiffSeg.ui, with its class.

The module checks this list when it loads the .ui, and Testing/ui checks the .ui file against it.
"""

WIDGET_CLASSES = {
    "dependencyFrame": "QFrame",
    "dependencyLabel": "QLabel",
    "installButton": "QPushButton",
    "inputsCollapsibleButton": "ctkCollapsibleButton",
    "inputVolumeLabel": "QLabel",
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "channel2Label": "QLabel",
    "channel2Selector": "qMRMLNodeComboBox",
    "channel3Label": "QLabel",
    "channel3Selector": "qMRMLNodeComboBox",
    "modelCollapsibleButton": "ctkCollapsibleButton",
    "modelSelector": "QComboBox",
    "modelInfoLabel": "QLabel",
    "importModelButton": "QPushButton",
    "removeModelButton": "QPushButton",
    "advancedCollapsibleButton": "ctkCollapsibleButton",
    "stepsSpinBox": "QSpinBox",
    "ensembleSpinBox": "QSpinBox",
    "samplerComboBox": "QComboBox",
    "presegComboBox": "QComboBox",
    "presegSegmentationLabel": "QLabel",
    "presegSegmentationSelector": "qMRMLNodeComboBox",
    "presegStepLabel": "QLabel",
    "presegStepSpinBox": "QSpinBox",
    "deviceComboBox": "QComboBox",
    "seedSpinBox": "QSpinBox",
    "maxMemorySpinBox": "QDoubleSpinBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "outputUncertaintySelector": "qMRMLNodeComboBox",
    "saveMembersCheckBox": "QCheckBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "logCollapsibleButton": "ctkCollapsibleButton",
    "logTextEdit": "QPlainTextEdit",
}

# Widgets bound to the parameter node's fields (DiffSegLib.parameters); each carries its field's name in
# the dynamic property SlicerParameterName too, as Slicer's own modules do.
PARAMETER_WIDGETS = {
    "inputVolume": "inputVolumeSelector",
    "channel2Volume": "channel2Selector",
    "channel3Volume": "channel3Selector",
    "steps": "stepsSpinBox",
    "ensemble": "ensembleSpinBox",
    "sampler": "samplerComboBox",
    "preseg": "presegComboBox",
    "presegSegmentation": "presegSegmentationSelector",
    "preseg_step": "presegStepSpinBox",
    "device": "deviceComboBox",
    "seed": "seedSpinBox",
    "max_memory": "maxMemorySpinBox",
    "outputSegmentation": "outputSegmentationSelector",
    "outputUncertainty": "outputUncertaintySelector",
    "saveMembers": "saveMembersCheckBox",
}

# The Review section (DiffSegLib/review_panel.py), after the outputs: the review table, region walk and overlay.
REVIEW_WIDGET_CLASSES = {
    "reviewCollapsibleButton": "ctkCollapsibleButton",
    "reviewInfoLabel": "QLabel",
    "reviewTable": "QTableWidget",
    "nextRegionButton": "QPushButton",
    "uncertaintyThresholdSlider": "ctkSliderWidget",
    "uncertaintyOpacitySlider": "ctkSliderWidget",
    "show3DButton": "QPushButton",
}
